"""Screen-space light transport (backend/screenspace.py) against analytic ray tracing of spheres on a plane:
cast shadows, one-bounce diffuse light and reflections, and the shadow net that refines them."""

import math

import numpy as np
import pytest
import torch

from backend.camera import view_directions
from backend.envmap import EnvironmentMap, uv_to_direction
from backend.jobformat import Camera, Options, read_result, write_result
from backend.models import build_shadow
from backend.renderer import PreparedGBuffer, Renderer
from backend.screenspace import (
    LIGHT_SETS,
    MIN_FACING,
    PREVIEW_BUDGET,
    PREVIEW_LIGHTS,
    REACH,
    THICKNESS,
    ScreenSpace,
    Sky,
    light_directions,
    specular_lobe,
)
from backend.shadow import ShadowNet
from backend.synthetic import Material, Plane, Sphere, constant_hdri, demo_scene_job, look_at, perspective, trace

HEIGHT = 64
SPHERES = [((-1.1, 0.0, 0.5), 0.5), ((0.0, 0.4, 0.5), 0.5), ((1.1, 0.0, 0.5), 0.5)]  # demo_scene_job's


def sun_hdri(row, col, sky=0.01, sun=2000.0, height=HEIGHT):
    """A dim sky and a 2x2-texel sun whose block's corner is at (row, col); returns (hdri, sun direction)."""
    hdri = np.full((height, 2 * height, 3), sky, np.float32)
    hdri[row:row + 2, col:col + 2] = sun
    theta, phi = (row + 1) / height * math.pi, (0.5 - (col + 1) / (2 * height)) * 2 * math.pi  # the contract's
    return hdri, np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])


def ray_hits_spheres(start, direction, spheres):
    """Per point (H, W, 3): whether the ray from it along direction ((3,) or (H, W, 3)) hits a sphere, and where."""
    hit, nearest = np.zeros(start.shape[:2], bool), np.full(start.shape[:2], np.inf)
    for centre, radius in spheres:
        offset = start - np.array(centre)
        b = (offset * direction).sum(-1)
        disc = b * b - ((offset * offset).sum(-1) - radius**2)
        t = -b - np.sqrt(np.maximum(disc, 0))
        new = (disc > 0) & (t > 0) & (t < nearest)
        hit |= new
        nearest = np.where(new, t, nearest)
    return hit, nearest


def envmap_texel_directions(rows):
    """Unit directions (2 rows^2, 3) through the texel centres of a 2:1 map, row by row (the contract's)."""
    v, u = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(2 * rows) + 0.5) / (2 * rows),
                          indexing="ij")
    return uv_to_direction(u, v).reshape(-1, 3).numpy()


def one_sphere_on_a_plane(width=160, height=120, material=None, floor=None):
    """A sphere of radius 0.5 resting on a plane, seen from above at an angle; returns (gbuffer, camera)."""
    camera = Camera(look_at((0.0, -4.0, 2.6), (0.0, 0.0, 0.3)), perspective(40.0, width / height))
    objects = [Plane(0.0, 3.0, floor or Material((0.5, 0.5, 0.5), roughness=0.8)),
               Sphere((0.0, 0.0, 0.5), 0.5, material or Material())]
    return trace(camera, width, height, objects), camera


def screen_space(gbuffer, camera, **kwargs) -> ScreenSpace:
    prepared = PreparedGBuffer.build(gbuffer, camera, "cpu")
    images = prepared.images
    return ScreenSpace(images["position"], images["normal"], images["depth"], images["mask"], prepared.pixels, camera,
                       back_depth=images.get("back_depth"), next_depth=images.get("next_depth"), **kwargs)


def components(mask, smallest=4):
    """Connected (4-neighbour) regions of a mask of at least `smallest` pixels."""
    far = mask.size
    label = np.where(mask, np.arange(mask.size).reshape(mask.shape), far)
    while True:
        low = label.copy()
        low[1:], low[:-1] = np.minimum(low[1:], label[:-1]), np.minimum(low[:-1], label[1:])
        low[:, 1:], low[:, :-1] = np.minimum(low[:, 1:], low[:, :-1]), np.minimum(low[:, :-1], low[:, 1:])
        low = np.where(mask, low, far)
        if np.array_equal(low, label):
            break
        label = low
    _, sizes = np.unique(label[mask], return_counts=True)
    return int((sizes >= smallest).sum())


def dilate(mask, pixels):
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@pytest.mark.parametrize("row, col", [(28, 80), (44, 180), (52, 120)])  # high behind, low right, low in front
def test_a_sphere_on_a_plane_casts_one_shadow_of_the_ray_traced_area(row, col):
    hdri, sun = sun_hdri(row, col, height=128)  # a sun 1.4 degrees wide
    gbuffer, camera = one_sphere_on_a_plane(240, 180)
    directions, weights = light_directions(EnvironmentMap(hdri))
    visibility = screen_space(gbuffer, camera).visibility(directions, weights)[0, 0].numpy()
    ground = (gbuffer.mask > 0) & (gbuffer.normal[..., 2] > 0.99)
    expected, _ = ray_hits_spheres(gbuffer.position + 1e-3 * gbuffer.normal, sun, [((0.0, 0.0, 0.5), 0.5)])
    expected &= ground
    shadowed = (visibility < 0.5) & ground
    assert expected.sum() > 200  # the case has a shadow on screen
    # its area, within 10% of ray tracing: the occlusion summed over the ground (the estimate is soft at
    # its edges, as the 32 light samples and the filter make it); thresholded at 0.5, within 20% (the
    # filter's blur moves a small shadow's 0.5 contour inwards: 16% for the 229-pixel one)
    assert abs((1 - visibility)[ground].sum() / expected.sum() - 1) < 0.10
    assert abs(shadowed.sum() / expected.sum() - 1) < 0.20
    # one shadow: no more pieces than the ray-traced one (which the sphere can cut), no ghost copies
    assert components(shadowed) <= components(expected)
    assert (shadowed & ~dilate(expected, 2)).sum() < 0.03 * expected.sum()
    assert visibility[gbuffer.mask == 0].min() == 1.0


def test_neighbouring_pixels_pool_their_light_sets_under_many_small_lamps():
    """A dim sky and twelve small lamps around the horizon, 20 degrees up: every lamp casts its own shadow of the
    sphere. 32 directions can sample only a few lamps; one set shared by all pixels draws some lamps' shadows
    and not others', the same everywhere, and no filter removes that. Sets that differ between neighbours,
    pooled by the filter, come close to the visibility integrated over every texel of the HDRI."""
    rows = 32
    hdri = np.full((rows, 2 * rows, 3), 0.05, np.float32)
    hdri[11, ::2 * rows // 12] = 400.0
    gbuffer, camera = one_sphere_on_a_plane()
    envmap = EnvironmentMap(hdri)
    texels = envmap_texel_directions(rows)
    solid_angle = np.sin((np.arange(rows) + 0.5) / rows * math.pi)[:, None].repeat(2 * rows, 1).reshape(-1)
    radiance = hdri.mean(-1).reshape(-1) * solid_angle
    foreground = gbuffer.mask > 0
    lit, total = np.zeros(foreground.shape), np.zeros(foreground.shape)
    start = gbuffer.position + 1e-3 * gbuffer.normal
    for direction, light in zip(texels, radiance, strict=True):
        weight = np.clip(gbuffer.normal @ direction, 0, None) * light
        blocked, _ = ray_hits_spheres(start, direction, [((0.0, 0.0, 0.5), 0.5)])
        lit += weight * ~blocked
        total += weight
    expected = np.where(total > 0, lit / np.maximum(total, 1e-12), 1.0)
    assert (expected[foreground] < 0.9).mean() > 0.1  # the lamps' shadows cover much of the view

    def error(sets):
        visibility = screen_space(gbuffer, camera).visibility(*light_directions(envmap, sets=sets))[0, 0].numpy()
        return np.abs(visibility - expected)[foreground].mean()

    pooled, shared = error(LIGHT_SETS), error(1)
    assert pooled < 0.03 and pooled < 0.6 * shared, (pooled, shared)  # measured: 0.018 and 0.044


def wall_hits(start, direction, wall_y, height, half_width=10.0):
    """Per start (..., 3): whether the ray along direction (3,) meets the rectangle y = wall_y, |x| <= half_width,
    0 <= z <= height; and at what distance (inf where it does not)."""
    t = (wall_y - start[..., 1]) / direction[1]
    x, z = start[..., 0] + t * direction[0], start[..., 2] + t * direction[2]
    hit = (t > 0) & (np.abs(x) <= half_width) & (z >= 0) & (z <= height)
    return hit, np.where(hit, t, np.inf)


def test_a_wall_behind_the_camera_shadows_the_floor_through_the_surround_map():
    """A floor seen from a camera with a wall 0.5 behind it, taller than the camera, and a low sun behind the
    wall: nothing on screen casts the wall's shadow over the near part of the floor. The job's surround map
    (the depth all around the camera, here traced analytically) shows the wall to the rays that leave the
    image: the shadow then covers the floor where ray tracing puts it."""
    from backend.shadowmaps import SURROUND, ShadowMap

    hdri, sun = sun_hdri(41, 191, height=128)  # behind the camera, 31 degrees up
    centre, wall_y, height = np.array([0.0, -4.0, 1.2]), -4.5, 2.0
    camera = Camera(look_at(centre, (0.0, 0.0, 0.3)), perspective(40.0, 160 / 120))
    gbuffer = trace(camera, 160, 120, [Plane(0.0, 3.0, Material((0.5, 0.5, 0.5), roughness=0.8))])
    rows = 128
    polar = (np.arange(rows) + 0.5) / rows * np.pi
    longitude = ((np.arange(2 * rows) + 0.5) / (2 * rows) - 0.5) * 2 * np.pi
    polar, longitude = np.meshgrid(polar, longitude, indexing="ij")
    # the directions of the map's texels: the contract's equirectangular layout, light space = world here
    towards = np.stack([np.sin(polar) * np.sin(longitude), np.cos(polar), -np.sin(polar) * np.cos(longitude)], -1)
    to_floor = np.where(towards[..., 2] < 0, -centre[2] / np.minimum(towards[..., 2], -1e-9), np.inf)
    on_floor = centre[None, None, :2] + to_floor[..., None] * towards[..., :2]
    to_floor = np.where((np.abs(on_floor) <= 3.0).all(-1), to_floor, np.inf)
    to_wall = np.stack([wall_hits(centre, d, wall_y, height)[1] for d in towards.reshape(-1, 3)]).reshape(rows, -1)
    world_to_light = np.eye(4)
    world_to_light[:3, 3] = -centre
    surround = ShadowMap(SURROUND, "surround.exr", "equirectangular", world_to_light, None, 0.0,
                         np.minimum(to_floor, to_wall).astype(np.float32))
    floor = gbuffer.mask > 0
    expected, distance = wall_hits(gbuffer.position + 1e-3 * gbuffer.normal, sun, wall_y, height)
    directions, weights = light_directions(EnvironmentMap(hdri))
    without = screen_space(gbuffer, camera).visibility(directions, weights)[0, 0].numpy()
    assert (without[floor] < 0.5).mean() < 0.01  # no occluder on screen
    space = screen_space(gbuffer, camera, surround=surround)
    shadowed = (space.visibility(directions, weights)[0, 0].numpy() < 0.5) & floor
    # within the march's reach (the scene's median depth) the shadow is where ray tracing puts it
    reached = floor & (distance < 0.9 * REACH * float(space.scale))
    assert (expected & reached).sum() > 500
    assert (shadowed == expected)[reached].mean() > 0.95
    assert (shadowed & ~expected).sum() < 0.01 * floor.sum()


@pytest.mark.parametrize("row, col", [(28, 80), (36, 128)])
def test_a_floating_ball_casts_a_shadow_of_its_size_from_its_back_depth(row, col):
    """A ball of radius 0.2 hanging 0.7 above the floor. Its back_depth says it is 0.4 deep and next_depth that
    the floor lies far behind, so rays that pass behind it reach the sun; without the layers the guessed
    thickness (a quarter of the scene's depth) makes it a long column whose shadow is twice too large."""
    hdri, sun = sun_hdri(row, col, height=128)
    ball = ((0.0, 0.0, 0.9), 0.2)
    camera = Camera(look_at((0.0, -4.0, 2.6), (0.0, 0.0, 0.3)), perspective(40.0, 240 / 180))
    gbuffer = trace(camera, 240, 180, [Plane(0.0, 3.0, Material((0.5, 0.5, 0.5), roughness=0.8)),
                                       Sphere(*ball, Material())])
    directions, weights = light_directions(EnvironmentMap(hdri))
    ground = (gbuffer.mask > 0) & (gbuffer.normal[..., 2] > 0.99)
    expected, _ = ray_hits_spheres(gbuffer.position + 1e-3 * gbuffer.normal, sun, [ball])
    expected &= ground
    assert expected.sum() > 200

    def shadow_area(gbuffer):
        return (1 - screen_space(gbuffer, camera).visibility(directions, weights)[0, 0].numpy())[ground].sum()

    assert abs(shadow_area(gbuffer) / expected.sum() - 1) < 0.25
    gbuffer.back_depth = None
    assert shadow_area(gbuffer) / expected.sum() > 1.8


def test_an_object_is_as_thick_as_measured_only_where_empty_space_follows_it():
    """A ball with another one close behind it and the floor far behind: where the rear ball follows the front
    one within the guessed thickness, the two may be one hollow object (a cup's walls) and the guess stands;
    where the floor lies further behind than that, the ball ends at its measured back."""
    camera = Camera(look_at((0.0, -4.0, 2.6), (0.0, 0.0, 0.3)), perspective(40.0, 4 / 3))
    gbuffer = trace(camera, 160, 120, [Plane(0.0, 3.0), Sphere((0.0, 0.0, 0.5), 0.5), Sphere((0.3, 1.2, 0.4), 0.4)])
    space = screen_space(gbuffer, camera)
    thickness = space.thickness_map.view(122, 162)[1:-1, 1:-1].numpy()
    guess = THICKNESS * space.scale.item() * np.clip((gbuffer.normal * view_directions(camera, 160, 120)).sum(-1),
                                                      MIN_FACING, 1)
    measured = gbuffer.back_depth - gbuffer.depth
    front = (gbuffer.mask > 0) & (gbuffer.back_depth < 1e9) & (np.abs(gbuffer.position[..., 1]) < 0.5)
    close = front & (gbuffer.next_depth - gbuffer.back_depth < 0.8 * guess)
    open_behind = front & (gbuffer.next_depth - gbuffer.back_depth > 1.2 * guess)
    assert close.sum() > 20 and open_behind.sum() > 200
    np.testing.assert_allclose(thickness[close], guess[close], rtol=1e-4)
    np.testing.assert_allclose(thickness[open_behind], measured[open_behind], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row, col", [(28, 50), (36, 76)])  # suns behind the ball, left and right
def test_rays_that_enter_a_thin_walled_ball_through_its_visible_side_are_blocked(row, col):
    """A ball of radius 0.8 with a 0.01 wall: the G-buffer measures the wall 0.01 thick (the empty space inside
    is deeper than the guess), so a step rarely lands inside it, and with the thickness test alone two thirds of
    the floor's rays that enter it through the side the camera sees got through (shares 0.38 and 0.36). Going
    from in front of the surface to behind it between two steps blocks them; those whose entry lies across the
    ball's silhouette from their last step can still slip (the depth jumps there, as between two objects)."""
    hdri, sun = sun_hdri(row, col, height=128)
    ball, eye = ((0.0, 0.0, 1.0), 0.8), np.array((0.0, -4.0, 2.6))
    camera = Camera(look_at(tuple(eye), (0.0, 0.0, 0.3)), perspective(40.0, 240 / 180))
    gbuffer = trace(camera, 240, 180, [Plane(0.0, 3.0, Material((0.5, 0.5, 0.5), roughness=0.8)), Sphere(*ball),
                                       Sphere(ball[0], ball[1] - 0.01)])
    space = screen_space(gbuffer, camera)
    wall = (gbuffer.mask > 0) & (gbuffer.back_depth < 1e9)
    assert (space.thickness_map.view(182, 242)[1:-1, 1:-1].numpy()[wall] < 0.05).mean() > 0.8  # measured thin
    start = gbuffer.position + 1e-3 * gbuffer.normal
    blocked, distance = ray_hits_spheres(start, sun, [ball])
    entry = start + np.where(blocked, distance, 0)[..., None] * sun
    seen = ((entry - ball[0]) * (eye - entry)).sum(-1) > 0  # on the side of the ball that faces the camera
    entering = blocked & seen & (gbuffer.normal[..., 2] > 0.99)
    assert entering.sum() > 3000
    visibility = space.visibility(*light_directions(EnvironmentMap(hdri)))[0, 0].numpy()
    assert (visibility[entering] < 0.5).mean() > 0.5


def test_the_demo_scenes_shadows_match_ray_traced_ones_on_the_ground():
    hdri, sun = sun_hdri(26, 80)
    job = demo_scene_job(128, 96, hdri=hdri)
    gbuffer = job.gbuffer
    directions, weights = light_directions(EnvironmentMap(hdri))
    visibility = screen_space(gbuffer, job.camera).visibility(directions, weights)[0, 0].numpy()
    ground = (gbuffer.mask > 0) & (gbuffer.normal[..., 2] > 0.99) & (gbuffer.normal @ sun > 0)
    expected, _ = ray_hits_spheres(gbuffer.position + 1e-3 * gbuffer.normal, sun, SPHERES)
    assert 0.05 < expected[ground].mean() < 0.6
    assert ((visibility[ground] < 0.5) == expected[ground]).mean() > 0.95


def test_nothing_blocks_an_empty_ground_and_depth_alone_gives_the_same():
    hdri, _ = sun_hdri(20, 60)
    job = demo_scene_job(64, 48, hdri=hdri)
    directions, weights = light_directions(EnvironmentMap(hdri))
    ground = trace(job.camera, 64, 48, [Plane(0.0, 2.5)])
    assert screen_space(ground, job.camera).visibility(directions, weights).min() == 1.0
    with_position = screen_space(job.gbuffer, job.camera).visibility(directions, weights)
    job.gbuffer.position = None  # reconstructed from the depth and the camera instead
    from_depth = screen_space(job.gbuffer, job.camera).visibility(directions, weights)
    assert with_position.min() < 0.5 and (with_position - from_depth).abs().mean() < 0.01


def test_a_rotated_hdri_casts_the_shadows_of_rotating_the_map():
    """Relights pass a rotation instead of a rotated map: the shadows must move the same way."""
    hdri, _ = sun_hdri(26, 80)
    job = demo_scene_job(128, 96, hdri=hdri)
    prepared = PreparedGBuffer.build(job.gbuffer, job.camera, "cpu")
    envmap = EnvironmentMap(hdri)
    black = torch.zeros(1, 3, 96, 128)
    angle = 2 * math.pi * 24 / hdri.shape[1]  # a whole number of texels: the rotated map is exact
    by_rotation = prepared.transport(envmap, angle, black, black).visibility
    of_rotated_map = prepared.transport(envmap.rotated(angle), 0.0, black, black).visibility
    unrotated = prepared.transport(envmap, 0.0, black, black).visibility
    assert (by_rotation < 0.5).float().mean() > 0.02  # the rotated sun still casts shadows on screen
    assert ((by_rotation < 0.5) == (of_rotated_map < 0.5)).float().mean() > 0.99
    assert ((by_rotation < 0.5) != (unrotated < 0.5)).float().mean() > 0.02  # and they moved


def test_marching_one_pixel_per_block_agrees_with_marching_every_pixel():
    hdri, _ = sun_hdri(26, 80)
    job = demo_scene_job(128, 96, hdri=hdri)
    directions, weights = light_directions(EnvironmentMap(hdri))
    every = screen_space(job.gbuffer, job.camera).visibility(directions, weights)
    shared = screen_space(job.gbuffer, job.camera, budget=128 * 96 // 4).visibility(directions, weights)
    assert (every < 0.5).float().mean() > 0.02  # there are shadows to agree on
    assert ((every < 0.5) == (shared < 0.5)).float().mean() > 0.97 and (every - shared).abs().mean() < 0.02


def test_the_preview_transport_marches_a_fraction_and_keeps_the_shadows_area():
    """Option "preview" (the viewport's first image): PREVIEW_LIGHTS directions from at most PREVIEW_BUDGET
    pixels, the blocks' edges filtered soft; the shadow keeps its place and, summed, its area."""
    hdri, sun = sun_hdri(28, 80, height=128)
    gbuffer, camera = one_sphere_on_a_plane(480, 360)
    preview = screen_space(gbuffer, camera, budget=PREVIEW_BUDGET)
    assert len(preview.starts) <= PREVIEW_BUDGET < (gbuffer.mask > 0).sum() / 16
    visibility = preview.visibility(*light_directions(EnvironmentMap(hdri), PREVIEW_LIGHTS))[0, 0].numpy()
    ground = (gbuffer.mask > 0) & (gbuffer.normal[..., 2] > 0.99)
    expected, _ = ray_hits_spheres(gbuffer.position + 1e-3 * gbuffer.normal, sun, [((0.0, 0.0, 0.5), 0.5)])
    expected &= ground
    assert abs((1 - visibility)[ground].sum() / expected.sum() - 1) < 0.25
    assert ((visibility < 0.5) & ground & ~dilate(expected, 8)).sum() < 0.05 * expected.sum()


def test_a_preview_relight_differs_from_the_full_one_only_in_the_transport():
    hdri, _ = sun_hdri(26, 80)
    job = demo_scene_job(96, 72, hdri=hdri)
    renderer = Renderer("cpu")
    cache = renderer.relight_cache(renderer.prepare(job), Options(rays=16, sampling="stratified"))
    full = renderer.relight(cache, hdri, 0.5)
    preview = renderer.relight(cache, hdri, 0.5, options=Options(rays=16, sampling="stratified", preview=True))
    assert np.array_equal(full.unshadowed, preview.unshadowed)
    assert not np.array_equal(full.shaded, preview.shaded)
    assert np.abs(full.transport["visibility"] - preview.transport["visibility"]).mean() < 0.05


def test_the_bounce_light_of_a_glowing_sphere_matches_its_form_factor():
    """A sphere of radiance L above a matte floor: the floor receives albedo L cos(theta) (r / d)^2 (the form
    factor of a sphere seen fully above the horizon) from it, and the sphere receives nothing from itself."""
    gbuffer, camera = one_sphere_on_a_plane(floor=Material((1.0, 1.0, 1.0), roughness=1.0, specular_level=0.0))
    space = screen_space(gbuffer, camera)
    sphere = (gbuffer.mask > 0) & (gbuffer.position[..., 2] > 1e-3)
    radiance = torch.from_numpy(np.where(sphere[..., None], 1.0, 0.0).astype(np.float32)).permute(2, 0, 1)[None]
    bounce = space.to_image(space.bounce(radiance, torch.zeros_like))[0, 0].numpy()  # a black sky
    offset = np.array([0.0, 0.0, 0.5]) - gbuffer.position
    distance = np.linalg.norm(offset, axis=-1)
    cos_theta = offset[..., 2] / np.maximum(distance, 1e-6)
    # floor points in front of the sphere (its visible side faces them), clear of the contact region
    floor = (gbuffer.mask > 0) & ~sphere & (gbuffer.position[..., 1] < -0.3) & (distance < 1.6)
    floor &= cos_theta > 0.5 / np.maximum(distance, 1e-6)  # the whole sphere above the horizon
    expected = cos_theta * (0.5 / distance) ** 2
    assert floor.sum() > 100 and expected[floor].mean() > 0.04
    assert abs(bounce[floor].mean() / expected[floor].mean() - 1) < 0.15
    assert bounce[sphere].max() < 1e-6  # a convex object does not light itself
    far = (gbuffer.mask > 0) & ~sphere & (distance > 2.5)
    assert bounce[far].mean() < 0.2 * expected[far].mean() + 1e-3


def test_the_floor_behind_a_ball_receives_its_whole_form_factor_from_the_side_the_camera_does_not_see():
    """A white matte ball of radiance 1 under a uniform sky of radiance 1 (E = pi for every normal, so its side
    that the camera does not see is taken to be as bright: albedo E / pi = 1), seen from above: the floor
    behind it, which faces mostly that side, receives the ball's whole form factor cos(theta) (r / d)^2.
    Without the unseen side (a black sky) it would receive less than half of it."""
    white = Material((1.0, 1.0, 1.0), roughness=1.0, specular_level=0.0)
    camera = Camera(look_at((0.0, -2.5, 5.0), (0.0, 0.3, 0.0)), perspective(40.0, 4 / 3))
    gbuffer = trace(camera, 160, 120, [Plane(0.0, 3.0, white), Sphere((0.0, 0.0, 0.5), 0.5, white)])
    space = screen_space(gbuffer, camera)
    sphere = (gbuffer.mask > 0) & (gbuffer.position[..., 2] > 1e-3)
    radiance = torch.from_numpy(np.where(sphere[..., None], 1.0, 0.0).astype(np.float32)).permute(2, 0, 1)[None]
    offset = np.array([0.0, 0.0, 0.5]) - gbuffer.position
    distance = np.linalg.norm(offset, axis=-1)
    expected = offset[..., 2] / np.maximum(distance, 1e-6) * (0.5 / np.maximum(distance, 1e-6)) ** 2
    behind = (gbuffer.mask > 0) & ~sphere & (gbuffer.position[..., 1] > 0.6) & (distance < 1.4)
    assert behind.sum() > 100

    def received(sky: float) -> float:
        irradiance = lambda normals: torch.full_like(normals, math.pi * sky)  # noqa: E731
        return space.to_image(space.bounce(radiance, irradiance))[0, 0].numpy()[behind].mean() / expected[behind].mean()

    assert abs(received(1.0) - 1) < 0.2
    assert received(0.0) < 0.5


def reflection_of(space, surfaces, specular, radiance, visibility):
    """space.reflection under a sky of `radiance` (a function of directions) with GGX rays only (no light
    directions), (H, W) of its first channel."""
    sky = Sky(radiance, torch.zeros_like, lambda directions: torch.zeros(directions.shape[:-1]))
    lights, free = torch.zeros(1, 0, 3), torch.zeros(len(space.starts), 0, dtype=torch.bool)
    return space.reflection(surfaces, specular, sky, visibility, lights, free)[0, 0].numpy()


def mirror_floor_hits(gbuffer, camera):
    """Per pixel: whether the floor's mirror ray from it meets the sphere of one_sphere_on_a_plane, how far, and
    the mirror direction."""
    eye = np.linalg.inv(camera.world_to_camera)[:3, 3]
    view = gbuffer.position - eye
    mirror = view * np.array([1.0, 1.0, -1.0])
    mirror /= np.linalg.norm(mirror, axis=-1, keepdims=True)
    hits, distance = ray_hits_spheres(gbuffer.position + 1e-3 * gbuffer.normal, mirror, [((0.0, 0.0, 0.5), 0.5)])
    return hits, distance, mirror


@pytest.mark.parametrize("visibility", [1.0, 0.3])
def test_a_mirror_floor_reflects_the_sphere_in_place_of_the_sky(visibility):
    """A white metal floor of low roughness under a sky of radiance 1 (its specular shading 1): where its
    mirror ray meets the sphere, the floor shows the sphere's diffuse light (0.25) and what its specular layer
    (F0 0.04) reflects of the sky; elsewhere the sky, 1. The same in the shadow of something the screen does
    not show (visibility 0.3, as in a sun's shadow): the image dims the whole shading by V, and the reflection
    term gives the specular layer its own lobe's visibility instead, so the floor still mirrors the sky."""
    floor = Material((1.0, 1.0, 1.0), metallic=1.0, roughness=0.05)
    gbuffer, camera = one_sphere_on_a_plane(floor=floor)
    space = screen_space(gbuffer, camera)
    sphere = (gbuffer.mask > 0) & (gbuffer.position[..., 2] > 1e-3)
    radiance = torch.from_numpy(np.where(sphere[..., None], 0.25, 0.0).astype(np.float32)).permute(2, 0, 1)[None]
    specular = torch.from_numpy((gbuffer.mask > 0) & ~sphere).float()[None, None].expand(1, 3, -1, -1)
    reflection = reflection_of(space, radiance, specular, torch.ones_like,
                               torch.full((1, 1, *sphere.shape), visibility))
    shaded = visibility * specular[0, 0].numpy() + reflection
    hits, _, _ = mirror_floor_hits(gbuffer, camera)
    ground = (gbuffer.mask > 0) & ~sphere
    inside, outside = ground & hits & ~dilate(~hits, 3), ground & ~dilate(hits, 3)
    assert inside.sum() > 100 and outside.sum() > 100
    assert abs(np.median(shaded[inside]) - (0.25 + 0.04)) < 0.05
    assert np.abs(shaded[outside] - 1.0).mean() < 0.01


def test_a_mirror_sphere_in_a_mirror_floor_shows_the_sky_it_reflects_towards_the_floor():
    """Two mirrors: the floor's mirror ray meets a mirror sphere, which reflects it on into the sky. The floor
    shows the sky along that second mirror direction, not what the sphere shows the camera (the radiance at
    the hit pixel), under a sky bright on the far side (+Y) and dark on the camera's. Compared on average:
    the floor sees the sphere's underside, which the camera does not, so the march lands on the visible
    surface where the ray enters the sphere and takes its normal."""
    mirror_metal = Material((1.0, 1.0, 1.0), metallic=1.0, roughness=0.05)
    gbuffer, camera = one_sphere_on_a_plane(material=mirror_metal, floor=mirror_metal)
    space = screen_space(gbuffer, camera)
    sphere = (gbuffer.mask > 0) & (gbuffer.position[..., 2] > 1e-3)

    def sky(directions):
        return (2 * directions[..., 1:2]).clamp(min=0).expand_as(directions)

    nothing = torch.zeros(1, 3, *sphere.shape)
    reflection = reflection_of(space, nothing, nothing, sky, torch.ones(1, 1, *sphere.shape))
    hits, distance, mirror = mirror_floor_hits(gbuffer, camera)
    at = gbuffer.position + np.where(hits, distance, 0)[..., None] * mirror
    normal = (at - np.array([0.0, 0.0, 0.5])) / 0.5

    def sky_along_mirror_of(incoming):
        outgoing = incoming - 2 * (incoming * normal).sum(-1, keepdims=True) * normal
        return np.maximum(2 * outgoing[..., 1], 0)

    seen_from_camera = at - np.linalg.inv(camera.world_to_camera)[:3, 3]
    seen_from_camera /= np.linalg.norm(seen_from_camera, axis=-1, keepdims=True)
    inside = (gbuffer.mask > 0) & ~sphere & hits & ~dilate(~hits, 3)
    expected = sky_along_mirror_of(mirror)[inside].mean()
    camera_view = sky_along_mirror_of(seen_from_camera)[inside].mean()
    assert inside.sum() > 100 and camera_view - expected > 0.5  # the sphere shows the camera far more sky
    assert abs(reflection[inside].mean() - expected) < 0.15


def test_a_hidden_sun_in_a_rough_lobe_is_found_by_the_light_directions():
    """A rough metal floor under a sun one degree wide that the depth buffer says is hidden from every pixel
    (free = False by construction): the reflection term takes the sun's whole glint S away. The 4 GGX rays
    per pixel practically never find so small a sun, so without the light directions the glint would stay,
    a highlight inside a shadow."""
    gbuffer, camera = one_sphere_on_a_plane(floor=Material((1.0, 1.0, 1.0), metallic=1.0, roughness=0.5))
    space = screen_space(gbuffer, camera)
    sun = torch.tensor([0.0, 0.5, 1.0]) / math.sqrt(1.25)
    cap = 2 * math.pi * (1 - math.cos(math.radians(1.0)))  # the sun's solid angle

    def radiance(directions):
        return torch.where(directions @ sun > math.cos(math.radians(1.0)), 1e4, 0.0)[..., None].expand_as(directions)

    def light_pdf(directions):  # one light direction, drawn uniformly over the sun's disc
        return torch.where(directions @ sun > math.cos(math.radians(1.0)), 1 / cap, 0.0)

    pixels = space.materials
    lobe, _ = specular_lobe(pixels.normal, pixels.wo, pixels.specular, pixels.roughness, sun.expand(len(pixels), 1, 3))
    glint = space.to_image(lobe[:, 0] * 1e4 * cap)  # the shading's specular part S: the sun's glint
    nothing, visible = torch.zeros(1, 3, *gbuffer.mask.shape), torch.ones(1, 1, *gbuffer.mask.shape)
    hidden = torch.zeros(len(space.starts), 1, dtype=torch.bool)
    with_sun = space.reflection(nothing, glint, Sky(radiance, torch.zeros_like, light_pdf), visible, sun[None, None],
                                hidden)
    rays_only = reflection_of(space, nothing, glint, radiance, visible)
    floor, shown = gbuffer.position[..., 2] < 1e-3, glint[0, 0].numpy()
    lit = floor & (shown > 0.05 * shown.max())
    assert lit.sum() > 500
    taken = -with_sun[0, 0].numpy()[lit].sum() / shown[lit].sum()
    assert 0.9 < taken < 1.05
    assert -rays_only[lit].sum() / shown[lit].sum() < 0.1


def test_rough_metal_reflects_what_stands_on_it_and_the_paths_are_kept_for_relights():
    """A rough white metal floor, everything on screen sending radiance 1 and a black sky: the reflection term
    is the share of the floor's GGX lobe that lands on the sphere, so it is there next to the sphere (a rough
    metal has no diffuse layer for the bounce to light) and nowhere far from it."""
    gbuffer, camera = one_sphere_on_a_plane(floor=Material((1.0, 1.0, 1.0), metallic=1.0, roughness=0.9))
    space = screen_space(gbuffer, camera)
    ones = torch.ones(1, 3, *gbuffer.mask.shape)
    floor = gbuffer.position[..., 2] < 1e-3
    reflection = reflection_of(space, ones, ones, torch.zeros_like, ones[:, :1])
    distance = np.hypot(gbuffer.position[..., 0], gbuffer.position[..., 1])  # from the sphere's foot
    near, far = floor & (distance < 1.3), floor & (distance > 2.5)
    assert near.sum() > 50 and far.sum() > 50
    assert reflection[near].mean() > 0.05 and np.abs(reflection[far]).mean() < 0.01
    first = space.bounce(ones, torch.zeros_like)
    assert set(space._paths) == {"bounce", "reflection"}
    assert torch.equal(space.bounce(ones * 2, torch.zeros_like), first * 2)  # linear in the radiance, the same rays


def test_the_transport_net_starts_at_the_physical_terms_and_stays_bounded():
    torch.manual_seed(0)
    net = ShadowNet(transport=True)
    images = [torch.rand(1, c, 16, 16) for c in (3, 3, 3, 1, 1)] + [torch.ones(1, 1, 16, 16)]
    visibility, indirect = torch.rand(1, 1, 16, 16), torch.randn(1, 3, 16, 16)
    shadow, out = net(*images, visibility, indirect)  # through the UNet (gradients on, as in training)
    assert net.is_identity and torch.equal(shadow, visibility) and torch.equal(out, indirect)
    with torch.inference_mode():  # where the UNet is skipped for its zero head: the same
        skipped = net(*images, visibility, indirect)
    assert torch.equal(skipped[0], shadow) and torch.equal(skipped[1], out)
    with torch.no_grad():
        for parameter in net.head.parameters():
            parameter.normal_(0, 100)
    shadow, out = net(*images, visibility, indirect)
    assert not net.is_identity
    assert 0 <= shadow.min() and shadow.max() <= 1 and not torch.equal(shadow, visibility)
    ratio = out / indirect
    assert ratio.min() >= math.exp(-1.5) - 1e-4 and ratio.max() <= math.exp(1.5) + 1e-4


def test_the_shadow_net_checks_its_transport_inputs():
    images = [torch.rand(1, c, 16, 16) for c in (3, 3, 3, 1, 1, 1)]
    physical = (torch.ones(1, 1, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="needs the transport inputs"):
        ShadowNet(transport=True)(*images)
    with pytest.raises(ValueError, match="takes no transport inputs"):
        ShadowNet()(*images, *physical)
    from backend.models import CheckpointError

    with pytest.raises(CheckpointError, match="older visibility-only input"):
        build_shadow({"arch": "unet", "base": 8, "depth": 2, "indirect": True, "visibility": True})


def test_the_renderer_writes_the_terms_as_debug_layers(tmp_path):
    hdri, _ = sun_hdri(26, 80, sky=0.5)
    job = demo_scene_job(64, 48, hdri=hdri, options=Options(model="default", rays=16, sampling="stratified"))
    result = Renderer("cpu").render(job)
    assert set(result.transport) == {"visibility", "bounce", "reflection"}
    assert result.transport["visibility"].shape == (48, 64) and result.transport["bounce"].shape == (48, 64, 3)
    assert result.transport["visibility"].min() < 0.5 and result.transport["bounce"].max() > 0
    write_result(tmp_path / "r.exr", result)
    back = read_result(tmp_path / "r.exr")
    for name, array in result.transport.items():
        np.testing.assert_allclose(back.transport[name], array, rtol=1e-6)
    no_shadows = Renderer("cpu").render(demo_scene_job(64, 48, hdri=constant_hdri(), options=Options(
        model="default", rays=16, sampling="stratified", shadows=False)))
    assert no_shadows.transport == {}
